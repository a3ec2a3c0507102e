"""The compiled kernels: C headers (the vector loops) and the Cython modules around them.

They know nothing of files, text or HTTP: they take arrays and return arrays. `_matvec`
holds the products of every weight format, `_layer` RWKV-4's fused layer, `_wkv`, `_group`
and `_step` the RWKV-5.2/6/7 recurrences and token steps, `_parallel` the thread policy.
"""
