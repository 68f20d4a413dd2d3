//! Job runs (imports, exports, archival) and the scheduler.
