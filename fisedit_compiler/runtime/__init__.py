"""What runs when a compiled U-Net is called: the record cache, the per-call context, the mask plan, and the
graph-callable ops that passes insert."""
