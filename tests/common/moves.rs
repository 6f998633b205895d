//! A whole move as processes (`haul_faults::moves`), of the rich fixture, with the haul binary
//! under test.

pub use haul_faults::moves::{Move, Setup};

/// Start a move of the rich fixture as `setup` says.
pub fn start(setup: Setup) -> anyhow::Result<Move> {
    Move::new(Setup {
        bin: super::procs::HAUL.into(),
        fixture: Some(super::RICH_SQL.into()),
        ..setup
    })
}
