"""Settings and the command line (the HTTP service joins here)."""
