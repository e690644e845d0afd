"""The data every package agrees on: what crosses a process (the describe job and its result, training
records, project settings) as typed models, and the one definition of the image a box refers to.

A leaf package: pydantic and Pillow only, no torch, no I/O beyond decoding bytes already in memory; it
imports none of roi_model, backend, worker or devstack, and all of them may import it.
"""
