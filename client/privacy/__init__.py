"""What a hospital does to a reply before it leaves: privacy mods around the handlers.

On the train handler (client/app.py's TRAIN_MODS, outermost first):
`secagg_mod` (masks the update; the hospital's SecAgg+ state is
`secagg_hospital`), the site's counts (`filters.count_floor_mod`),
`filters.dp_clipping_mod` (clips it with Flower's own mods). Flower applies the
list outside-in on the way in and inside-out on the way out, so the update is
clipped, then masked. On every route the counts a reply carries are written
from the site's one decision (`disclosure`): `count_floor_mod` for training
and evaluation, `small_count_mod` for the statistics query.
"""
