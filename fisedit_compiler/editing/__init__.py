"""The editing half of FISEdit: token alignment, mask detection, and the cached edit session."""
