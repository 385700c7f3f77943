"""Views of a decision for people: each takes the contract's decision JSON (a dict) and returns
text, never touching a terminal. ``coordinator``: what a referral coordinator acts on."""
