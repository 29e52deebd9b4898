"""The editing half of FISEdit: token alignment, mask detection, and the cached edit session."""

# The classifier-free guidance of an edit session unless told otherwise: `EditSession`'s, the CLI's, the demo's and
# the service's. On the shapes model a colour swap erased its object twice as often at 5 (issue 37).
GUIDANCE_SCALE = 7.5
