// run_scripted: runs a TorchScript module that calls torch.ops.lightning_cache.*
// from C++, one call per decode step, and saves what each call returned.
//
//   run_scripted <module.pt> <inputs.pt> <outputs.pt> [method]
//
// module.pt   torch.jit.save of a scripted module; its buffers (caches, states)
//             carry over from one call to the next, as in a decode loop.
// inputs.pt   torch.save(steps) in Python, where steps is a list with one entry
//             per step: a list (or tuple) of the positional arguments of that step.
// outputs.pt  written here: a tuple with what each step returned, readable with
//             torch.load(path) in Python (weights_only=True is enough).
// method      the method to call, "forward" unless given (e.g. "decode_step").
//
// Both files use torch.save's zip format: torch::pickle_load reads what
// torch.save writes, and torch::pickle_save writes what torch.load reads.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include "file_bytes.h"

#include <iostream>
#include <string>
#include <vector>

namespace {

using lightning_cache_examples::read_file;
using lightning_cache_examples::write_file;

// The ops are registered by static initializers of liblightning_cache_ops; if
// the linker dropped the library, torch::jit::load fails with an obscure
// "unknown builtin op" error. Say what is wrong instead.
void require_ops_registered() {
  if (!c10::Dispatcher::singleton().findSchema({"lightning_cache::concatenate_to_cache", ""})) {
    throw std::runtime_error(
        "the lightning_cache ops are not registered: link liblightning_cache_ops with -Wl,--no-as-needed");
  }
}

// One step's arguments: a list or tuple of values, or a single value.
std::vector<c10::IValue> step_arguments(const c10::IValue& step) {
  if (step.isList()) return step.toListRef().vec();
  if (step.isTuple()) return step.toTupleRef().elements().vec();
  return {step};
}

// Lists become tuples, for the same reason as the outputs as a whole (below).
c10::IValue as_tuples(const c10::IValue& value) {
  if (!value.isList() && !value.isTuple()) return value;
  std::vector<c10::IValue> items;
  for (const c10::IValue& item : step_arguments(value)) items.push_back(as_tuples(item));
  return c10::ivalue::Tuple::create(std::move(items));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " <module.pt> <inputs.pt> <outputs.pt> [method]\n";
    return 2;
  }
  const std::string method_name = argc == 5 ? argv[4] : "forward";
  try {
    require_ops_registered();
    torch::NoGradGuard no_grad;  // inference only, like a decode loop in Python
    torch::jit::Module module = torch::jit::load(argv[1]);
    module.eval();
    torch::jit::Method method = module.get_method(method_name);

    const c10::IValue steps = torch::pickle_load(read_file(argv[2]));
    TORCH_CHECK(steps.isList(), "inputs must be a list with one entry per step, got ", steps.tagKind());

    std::vector<c10::IValue> outputs;
    for (const c10::IValue& step : steps.toListRef()) {
      outputs.push_back(as_tuples(method(step_arguments(step))));
    }
    // Tuples, not c10::List: a typed list is pickled with a type tag
    // (torch.jit._pickle.restore_type_tag) that torch.load(weights_only=True)
    // refuses; tuples of tensors load with the default safe unpickler.
    write_file(argv[3], torch::pickle_save(c10::ivalue::Tuple::create(std::move(outputs))));
    std::cout << "ran " << steps.toListRef().size() << " steps of " << method_name << "\n";
  } catch (const std::exception& e) {
    std::cerr << "run_scripted: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
