//! volley: a bulk outbound SMTP sender. See DESIGN in the README for the data
//! flow: spool → ingest → shards (one glommio executor per core) → pipelined
//! SMTP sessions → outcomes.

pub mod classify;
pub mod collector;
pub mod config;
pub mod demo;
pub mod dkim;
pub mod dns;
pub mod downgrade;
pub mod fleet;
pub mod generator;
pub mod headers;
pub mod ingest;
pub mod journal;
pub mod local;
pub mod lock;
pub mod messages;
pub mod metrics;
pub mod outcome;
pub mod proxy;
pub mod runtime;
pub mod send;
pub mod service;
pub mod shaping;
pub mod shard;
pub mod sink;
pub mod smtp;
pub mod split;
pub mod spool;
pub mod template;
pub mod tls;
