"""Features: what the platform knows about users and items, computed from events, kept in Feast."""
