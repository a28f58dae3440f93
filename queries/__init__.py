"""DuckDB views, saved SQL queries and a command line over the entropy warehouse."""
