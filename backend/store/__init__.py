"""What the backend keeps: one database path (SQLite or PostgreSQL) and a store per concern."""
