"""Data-overlap analysis (the paper's section 5): duplicate detection, contamination statistics."""
