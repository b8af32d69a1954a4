//! The engine, from the guest's side: frames (raw, or IPv4 packets with valid headers around
//! the fuzzer's transport bytes), host peers writing and closing, readiness and time (see
//! `usernet_core::engine::synthetic::fuzz_guest_frames` for the input's format).
fn main() {
    afl::fuzz!(|data: &[u8]| {
        usernet_core::engine::synthetic::fuzz_guest_frames(data);
    });
}
