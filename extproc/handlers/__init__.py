"""One module per method family: lifecycle (initialize, discover, ping, notifications), lists, routed calls."""
