// The `cuda` backend's op schemas. The reference and Triton ops are defined in Python
// with the same schemas (seqrec_kernels/ops/*.py; tests/test_op_schemas.py keeps the two
// equal), and seqrec_kernels/ops/_library.py registers the fake impls and autograd of all
// of them. Implementations: ops_cpu.cpp (CPU), ops_cuda.cpp (CUDA, when built with it),
// behind the input checks and registration of op_impls.h.
#include <Python.h>
#include <torch/library.h>

// `import seqrec_kernels._C` loads this library, which registers the ops below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(seqrec, m) {
  m.def(
      "attention_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor seq_start, Tensor seq_len, int max_seqlen,"
      " bool causal, float scale, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seq_start,"
      " Tensor seq_len, int max_seqlen, bool causal, float scale, float dropout_p, Tensor? dropout_seed)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "sampled_softmax_fwd_cuda(Tensor hidden, Tensor weight, Tensor pos_ids, Tensor neg_ids, Tensor? pos_log_q,"
      " Tensor? neg_log_q, int rows_per_group, bool remove_hits, float temperature, int ignore_index)"
      " -> (Tensor, Tensor)");
  m.def(
      "sampled_softmax_bwd_cuda(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor pos_ids, Tensor neg_ids,"
      " Tensor? pos_log_q, Tensor? neg_log_q, Tensor lse, int rows_per_group, bool remove_hits, float temperature,"
      " int ignore_index, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "full_softmax_fwd_cuda(Tensor hidden, Tensor weight, Tensor targets, Tensor excluded_ids, float temperature,"
      " int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "full_softmax_bwd_cuda(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor targets, Tensor excluded_ids,"
      " Tensor lse, float temperature, int ignore_index) -> (Tensor, Tensor)");
}
