//! SMTP: reply parsing, capabilities and the client session engine (no I/O),
//! and message preparation for the wire.

pub mod caps;
pub mod engine;
pub mod reply;
pub mod wire;

pub use caps::Capabilities;
pub use engine::{
    Command, Credentials, Decider, Envelope, Event, Extensions, Seen, Session, Status, TlsMode, TxnReport, TxnTiming,
    Wait,
};
pub use reply::{Enhanced, Reply, ReplyError, ReplyParser};
pub use wire::WireMessage;
