//! A TAP device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI): one read or write per frame.
