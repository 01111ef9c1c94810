"""The baseline servers of the benchmark: (a) trivial, (b) inline (the guide's approach)."""
