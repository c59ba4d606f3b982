"""KFP v2 components: thin wrappers over onerec library functions (see README, "Status")."""
