"""Sans-IO protocol cores: parsing and building wire messages, no I/O."""
