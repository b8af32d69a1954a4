//! Exit statuses, as `docker run` has them: the command's own status, or one of these.

/// usernet itself failed (a bad flag, a bad `-p`, a taken port, no permission).
pub const USERNET_FAILED: i32 = 125;
/// The command was found but cannot be invoked.
pub const CANNOT_INVOKE: i32 = 126;
/// The command was not found.
pub const NOT_FOUND: i32 = 127;
