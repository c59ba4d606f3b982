"""Reward feedback and alignment (issue 8).

rewards.py  reactions -> rewards: explicit ratings, OneRec-V2 duration-aware shaping
losses.py   ECPO (V1), GBPO (V2) and DPO policy losses over groups of sampled sessions
"""
