"""What a hospital does to a message and its reply before anything leaves: the privacy mods.

`round_guard` (a round, a model and the run's settings taken once), `secagg_mod`
(the update masked; the hospital's SecAgg+ state is `secagg_hospital`),
`filters` (the counts a reply shows, from the site's one decision in
`disclosure`; Flower's DP clipping mods) and `hospital_noise` (DP noise the
hospital adds itself). Which mod runs around which handler, and in what
order, is listed once: client/app.py.
"""
