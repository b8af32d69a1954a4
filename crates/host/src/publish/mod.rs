//! Publishing guest ports on the host, as `docker run -p` does: Docker's port grammar
//! (`spec`) and the host listeners (`listen`). The engine turns each accepted connection or
//! received datagram into a guest flow.

pub mod listen;
pub mod spec;
