"""SecAgg+ building blocks shared by the coordinator and the hospitals.

The protocol is Bell et al. 2020 (SecAgg+), itself built on Bonawitz et al.
2017: pairwise masks that cancel in the sum, a self mask per hospital, and
Shamir shares that let the coordinator remove the masks of hospitals that
dropped out, but never learn one hospital's update.
"""
