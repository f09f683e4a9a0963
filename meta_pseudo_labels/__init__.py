"""Meta Pseudo Labels (Pham, Dai, Xie, Le, CVPR 2021) in JAX/Flax."""
