"""The ext_proc processor and its command line."""
