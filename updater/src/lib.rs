//! update-engine and updatectl (issue #5): not written yet. The crate exists so
//! the workspace has the shape DESIGN.md fixes; it deliberately exports nothing.
