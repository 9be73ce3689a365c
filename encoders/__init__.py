"""Text and code encoders, offline model resolution, embedding compression."""
