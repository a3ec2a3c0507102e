# The row kernels of _wkv.pyx that the fused token steps (_step.pyx) call directly; see there.

cdef void _mix_rows(Py_ssize_t T, Py_ssize_t C, Py_ssize_t M, const float* x, const float* prev,
                    const float* mix, float* out, int n_threads) noexcept nogil

cdef void _v7_prepare(Py_ssize_t T, Py_ssize_t H, Py_ssize_t N, float* w, float* k, float* v, const float* a_lora,
                      const float* v_lora, const float* v_first, const float* w0, const float* a0, const float* v0,
                      const float* k_k, const float* k_a, float decay_scale, float* kk, float* b,
                      int n_threads) noexcept nogil

cdef void _wkv7(int level, const Py_ssize_t* starts, Py_ssize_t B, Py_ssize_t H, Py_ssize_t N, const float* r,
                const float* w, const float* k, const float* v, const float* kk, const float* b,
                const float* r_k, const float* ln_w, const float* ln_b, const float* g, double eps,
                const float** S_in, float** S, float* y, float* out, int n_threads) noexcept nogil

cdef void _lora_act(Py_ssize_t n_tanh, float* tanh_in_place, Py_ssize_t n_sigmoid, float* sigmoid_in_place) noexcept nogil

cdef void _wkv5(int level, const Py_ssize_t* starts, Py_ssize_t B, Py_ssize_t H, Py_ssize_t N, const float* r,
                const float* k, const float* v, const float* w, Py_ssize_t w_step, const float* u,
                const float* ln_w, const float* ln_b, const float* g, double eps, const float** S_in, float** S,
                float* y, float* out, int n_threads) noexcept nogil
