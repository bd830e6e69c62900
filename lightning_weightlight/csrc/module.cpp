// Python module stub: importing lightning_weightlight._C loads this library, whose static
// initialisers register the torch.ops.weightlight operators. It defines no Python functions.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
