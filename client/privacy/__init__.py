"""What a hospital does to a reply before it leaves: privacy mods around the handlers.

On the train handler (client/app.py's TRAIN_MODS, outermost first): the site's
floor on counts (`filters.count_floor_mod`), `secagg_mod` (masks the update;
the hospital's SecAgg+ state is `secagg_hospital`), `filters.dp_clipping_mod`
(clips it with Flower's own mods). Flower applies the list outside-in on the
way in and inside-out on the way out, so the update is clipped, then masked.
On the query handler, `filters.small_count_mod` suppresses small counts.
"""
