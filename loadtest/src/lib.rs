//! The load generator's logic, kept apart from its command line so it can be tested: request
//! builders and outcome classes (`target`), open-loop schedules (`schedule`), latency histograms
//! (`hist`), CPU accounting from /proc (`cpu`), and reports (`report`).
// A load generator reads the clock (latency is what it measures) and prints its report.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

pub mod cpu;
pub mod hist;
pub mod report;
pub mod run;
pub mod schedule;
pub mod target;
