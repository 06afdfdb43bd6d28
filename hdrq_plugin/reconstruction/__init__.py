"""Block-wise reconstruction engine."""
