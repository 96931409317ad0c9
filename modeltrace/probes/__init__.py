"""Behavioural evidence: what a model says about itself (identity probe) and whose outputs it reproduces
(black-box provenance test).

bank.py      the data: identity questions (en, pt, es, zh), general prompts, known model and company names
extract.py   names and organisations a model declares, refusals, empty answers, language and script of an answer
backends.py  one small interface over a local transformers model and any OpenAI-compatible chat endpoint
             (chat.py the interface, local.py and endpoint.py the two backends; `open_backend` picks one)
identity.py  `probe identity`: shares of declared names with Wilson intervals, raw answers kept
compare.py   `probe compare`: similarity of outputs and next-token distributions against unrelated references

Weights prove a derivation (`modeltrace audit`); behaviour is what an API user can see. Identity alone is weak
evidence: models imitate each other's self-descriptions, so the reports say so.
"""
