"""The maths: probability paths (t=0 noise, t=1 data), time samplers, couplings and the exact assignment, the DDPM
schedule, objectives, solvers, classifier-free guidance and metrics. Imports nothing of ours but itself and
`latentflow.errors`."""
