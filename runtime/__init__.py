"""sdexport runtime: loads a frozen artifact and generates images with no model code."""
