//! The server name (SNI) of a TLS ClientHello, read without terminating TLS.
//!
//! Theory of operation: a transparently intercepted TLS connection is relayed untouched; all
//! usernet needs is the name the client asked for, to send `CONNECT name:port` to the
//! upstream proxy. [`parse_client_hello`] looks at the bytes the guest sent so far (the
//! caller peeks them, so they stay in the socket to be relayed later) and says whether they
//! are not TLS at all, not complete yet, or a whole ClientHello with or without a usable name.
//!
//! It reassembles the handshake message from consecutive handshake records (a ClientHello
//! may span several), then walks the ClientHello (RFC 8446 4.1.2): version, random, session
//! id, cipher suites, compression methods, extensions, and in the `server_name` extension
//! (RFC 6066 3) the first `host_name`. Every length is checked against what is left; a
//! malformed hello is "TLS without a name" (the caller falls back to the IP), never a panic.
//! A name is only returned when it is a plausible DNS name (letters, digits, `-`, `_`, `.`),
//! so it is safe to put in a CONNECT request line.

/// Largest ClientHello we wait for; beyond this we give up on the name.
pub const MAX_HELLO: usize = 64 * 1024;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// Largest TLSPlaintext fragment (2^14) plus the slack TLS 1.2 allows for ciphertext.
const MAX_RECORD: usize = 16384 + 2048;

/// What the bytes seen so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A plausible start of a ClientHello: read more.
    Incomplete,
    /// Not a TLS ClientHello.
    NotTls,
    /// A whole ClientHello (or one too broken or too big to read): its server name, if any.
    Done(Option<String>),
}

/// Looks at the first bytes of a connection.
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Hello::Incomplete;
        };
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            // The first record decides whether this is TLS; a later one that is not a
            // handshake record cuts the hello short.
            return if pos == 0 { Hello::NotTls } else { Hello::Done(None) };
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return if pos == 0 { Hello::NotTls } else { Hello::Done(None) };
        }
        // The handshake message type is known from the first fragment byte.
        if pos == 0 && buf.get(5).is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO) {
            return Hello::NotTls;
        }
        let Some(fragment) = buf.get(pos + 5..pos + 5 + len) else {
            return Hello::Incomplete;
        };
        handshake.extend_from_slice(fragment);
        pos += 5 + len;
        if handshake.len() < 4 {
            continue;
        }
        let msg_len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
        if msg_len > MAX_HELLO {
            return Hello::Done(None);
        }
        if handshake.len() >= 4 + msg_len {
            return Hello::Done(server_name(&handshake[4..4 + msg_len]));
        }
    }
}

/// A cursor over a byte slice whose reads fail (None) past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 1- or 2-byte length prefix, as a reader of its own.
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u8()?);
        self.bytes(n).map(|buf| Reader { buf })
    }

    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = usize::from(self.u16()?);
        self.bytes(n).map(|buf| Reader { buf })
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The host name in a ClientHello body (after the 4-byte handshake header).
fn server_name(body: &[u8]) -> Option<String> {
    let mut r = Reader { buf: body };
    r.bytes(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    if r.is_empty() {
        return None; // no extensions at all (SSL 3.0 style)
    }
    let mut exts = r.vec16()?;
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let mut data = exts.vec16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut list = data.vec16()?;
        while !list.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == NAME_TYPE_HOST {
                return valid_name(name.buf);
            }
        }
        return None;
    }
    None
}

/// A DNS name safe to send on: lower case, no trailing dot.
fn valid_name(raw: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(raw).ok()?.trim_end_matches('.');
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    ok.then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURL: &[u8] = include_bytes!("testdata/curl_hello.bin");
    const OPENSSL: &[u8] = include_bytes!("testdata/openssl_hello.bin");
    const NO_SNI: &[u8] = include_bytes!("testdata/nosni_hello.bin");

    /// A minimal ClientHello with the given extensions block, in one record.
    fn hello(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        if let Some(ext) = extensions {
            body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            body.extend_from_slice(ext);
        }
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![NAME_TYPE_HOST];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    #[test]
    fn real_hellos() {
        assert_eq!(parse_client_hello(CURL), Hello::Done(Some("curl.example".into())));
        assert_eq!(parse_client_hello(OPENSSL), Hello::Done(Some("openssl.example".into())));
        assert_eq!(parse_client_hello(NO_SNI), Hello::Done(None));
    }

    #[test]
    fn every_truncation_is_incomplete() {
        for hello in [CURL, OPENSSL, NO_SNI] {
            for n in 0..hello.len() {
                assert_eq!(parse_client_hello(&hello[..n]), Hello::Incomplete, "cut at {n}");
            }
        }
    }

    #[test]
    fn trailing_data_is_ignored() {
        let mut b = CURL.to_vec();
        b.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
        assert_eq!(parse_client_hello(&b), Hello::Done(Some("curl.example".into())));
    }

    #[test]
    fn hello_split_over_records() {
        // Re-frame the curl hello's handshake message into 100-byte records.
        let hs = &CURL[5..];
        let mut b = Vec::new();
        for chunk in hs.chunks(100) {
            b.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            b.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            b.extend_from_slice(chunk);
        }
        assert_eq!(parse_client_hello(&b), Hello::Done(Some("curl.example".into())));
        for n in 0..b.len() {
            assert_eq!(parse_client_hello(&b[..n]), Hello::Incomplete, "cut at {n}");
        }
    }

    #[test]
    fn not_tls() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        // A handshake record that is not a ClientHello (a ServerHello).
        assert_eq!(parse_client_hello(&[22, 3, 3, 0, 10, 2, 0, 0, 6]), Hello::NotTls);
        // SSL 2 / bad version byte, zero and oversized records.
        assert_eq!(parse_client_hello(&[22, 2, 0, 0, 10, 1]), Hello::NotTls);
        assert_eq!(parse_client_hello(&[22, 3, 1, 0, 0]), Hello::NotTls);
        assert_eq!(parse_client_hello(&[22, 3, 1, 0xff, 0xff, 1]), Hello::NotTls);
    }

    #[test]
    fn synthetic_names() {
        assert_eq!(
            parse_client_hello(&hello(Some(&sni_ext(b"Secure.Test.")))),
            Hello::Done(Some("secure.test".into()))
        );
        assert_eq!(parse_client_hello(&hello(None)), Hello::Done(None));
        assert_eq!(parse_client_hello(&hello(Some(&[]))), Hello::Done(None));
        // Names that must not reach a CONNECT line.
        for bad in [&b"a b"[..], b"x\r\nHost: y", b"", b".", b"h:443", b"\xff\xfe", &[b'a'; 300]] {
            assert_eq!(parse_client_hello(&hello(Some(&sni_ext(bad)))), Hello::Done(None), "{bad:?}");
        }
        // Another extension before the server name.
        let mut ext = vec![0, 10, 0, 4, 0, 2, 0, 29];
        ext.extend_from_slice(&sni_ext(b"second.test"));
        assert_eq!(parse_client_hello(&hello(Some(&ext))), Hello::Done(Some("second.test".into())));
    }

    #[test]
    fn garbled_lengths_never_panic() {
        // Every single-byte corruption of the real hellos parses to something.
        for base in [CURL, OPENSSL] {
            for i in 0..base.len() {
                for v in [0u8, 1, 0x7f, 0xff] {
                    let mut b = base.to_vec();
                    b[i] = v;
                    let _ = parse_client_hello(&b);
                }
            }
        }
        // An extension whose length runs past the end of the hello.
        let mut ext = sni_ext(b"x.test");
        ext[3] = 0xff;
        assert_eq!(parse_client_hello(&hello(Some(&ext))), Hello::Done(None));
        // A handshake length larger than MAX_HELLO: give up on the name at once.
        assert_eq!(parse_client_hello(&[22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]), Hello::Done(None));
    }

    proptest::proptest! {
        #[test]
        fn random_input_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse_client_hello(&data);
            let mut tls = vec![22u8, 3, 1];
            tls.extend_from_slice(&data);
            let _ = parse_client_hello(&tls);
        }
    }
}
