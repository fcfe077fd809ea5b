"""What a hospital does to a reply before it leaves: Flower mods around the handlers.

On the train handler, outermost first: `outbound_audit_mod` (records what is
sent), `secagg_mod` (masks the update), `dp_clipping_mod` (clips it with
Flower's mods). Flower applies the list outside-in on the way in and
inside-out on the way out, so the update is clipped, then masked, then
audited. On the query handler, `small_count_mod` suppresses small counts.
"""
