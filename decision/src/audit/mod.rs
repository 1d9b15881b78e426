//! The audit trail: events built with credentials already masked (`event`), chained by SHA-256
//! so that any change, removal, insertion or reordering shows (`chain`), and verified offline by
//! `portcullis audit verify`. Sinks and the request-path wiring come in a later step.

pub mod chain;
pub mod event;
