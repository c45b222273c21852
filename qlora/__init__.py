"""Pipeline steps: plain functions (called by tests) and their thin Prefect task wrappers (called by flows)."""
