//! The command line:
//! - [`args`]: the clap definitions (values parsed and checked there);
//! - [`commands`]: `scan`, `reap`, `explain`, `check`, each run once;
//! - [`plan`]: which observed sockets a command selects and acts on (pure);
//! - [`render`]: tables for people, JSON lines for machines;
//! - [`first_screen`]: what `scan` prints on a terminal (one screen, then what to run next);
//! - [`diagnosis`]: the pure part of `explain` (bug classes, leak rate, EMFILE forecast);
//! - [`where_report`]: the pure part of `explain --where` (stacks grouped per process);
//! - [`manual`]: man pages and shell completions generated from the definitions.

pub mod args;
pub mod commands;
pub mod diagnosis;
pub mod first_screen;
pub mod manual;
pub mod plan;
pub mod render;
pub mod where_report;
