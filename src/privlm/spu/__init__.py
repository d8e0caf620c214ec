"""privlm.spu: measured private inference of privlm models under SecretFlow SPU (2PC).

Two environments are involved, because ``spu==0.9.5`` needs numpy<2 and jax 0.4.34 while the rest of
privlm needs numpy 2 (``make spu-setup`` builds ``.venv-spu``):

main environment (torch)                          SPU environment (.venv-spu, jax + spu, no torch)
-----------------------------------------------   ---------------------------------------------------
``export``    model -> traced program + weights   ``program``   the traced graph as a list of JAX steps
``launcher``  finds .venv-spu, starts parties     ``party``     one 2PC party (client or server)
``cli``       ``privlm pi run|eval|calibrate|...`` ``linkstats`` SPU's per-run link counters
``calibrate`` writes ``spu-<profile>-measured`` ``microbench`` per-op micro-benchmarks
              cost profile                        ``kernels``   softmax/GELU/LayerNorm kernels + bounds
``wan``       namespaces + veth + tbf             ``spu_profile`` SPU profiles (stdlib; both envs)

This package lives outside ``privlm.pi`` on purpose: ``privlm.pi`` imports torch (the census walks the
model), and the SPU-side modules must import without it. Nothing here is imported at package import.
"""
