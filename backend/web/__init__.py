"""The web layer: routes, the ML API translation, the admin API and page; the one place errors become HTTP."""
