// run_aoti: runs an AOTInductor package (torch._inductor.aoti_compile_and_package of an exported step that
// calls torch.ops.lightning_cache.*) from C++, step after step on caches this program owns.
//
//   run_aoti <package.pt2> <inputs.pt> <outputs.pt>
//
// package.pt2  the compiled step: step(tokens, *caches) -> outputs, updating the caches in place
//              (HybridLM.forward_with_caches exported with torch.export).
// inputs.pt    torch.save((caches, steps)) in Python: caches is a list of tensors (the live caches, as
//              HybridLM.cache_buffers() orders them), steps a list with the token tensor of each step.
// outputs.pt   written here: (outputs, caches), the first output of every step and the caches after the
//              last one, readable with torch.load(path, weights_only=True).
//
// The package calls the lightning_cache ops through the dispatcher, so liblightning_cache_ops must be linked
// (with --no-as-needed, as CMakeLists.txt does) for them to be registered.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/serialize.h>
#include <torch/torch.h>

#include "file_bytes.h"

#include <iostream>
#include <string>
#include <vector>

namespace {

using lightning_cache_examples::read_file;
using lightning_cache_examples::write_file;

std::vector<at::Tensor> tensors(const c10::IValue& value, const char* what) {
  TORCH_CHECK(value.isList() || value.isTuple(), what, " must be a list of tensors, got ", value.tagKind());
  std::vector<at::Tensor> result;
  const auto items = value.isList() ? value.toListRef().vec() : value.toTupleRef().elements().vec();
  for (const c10::IValue& item : items) {
    TORCH_CHECK(item.isTensor(), what, " must hold tensors only, got ", item.tagKind());
    result.push_back(item.toTensor());
  }
  return result;
}

c10::IValue as_tuple(const std::vector<at::Tensor>& values) {
  return c10::ivalue::Tuple::create(std::vector<c10::IValue>(values.begin(), values.end()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " <package.pt2> <inputs.pt> <outputs.pt>\n";
    return 2;
  }
  try {
    if (!c10::Dispatcher::singleton().findSchema({"lightning_cache::concatenate_to_cache", ""})) {
      throw std::runtime_error(
          "the lightning_cache ops are not registered: link liblightning_cache_ops with -Wl,--no-as-needed");
    }
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);

    const c10::IValue inputs = torch::pickle_load(read_file(argv[2]));
    TORCH_CHECK(inputs.isTuple() && inputs.toTupleRef().elements().size() == 2,
                "inputs must be the tuple (caches, steps)");
    std::vector<at::Tensor> caches = tensors(inputs.toTupleRef().elements()[0], "caches");
    const std::vector<at::Tensor> steps = tensors(inputs.toTupleRef().elements()[1], "steps");

    std::vector<at::Tensor> outputs;
    for (const at::Tensor& tokens : steps) {
      std::vector<at::Tensor> args{tokens};
      args.insert(args.end(), caches.begin(), caches.end());  // same tensors every step: updated in place
      outputs.push_back(loader.run(args).at(0));
    }
    std::vector<c10::IValue> result{as_tuple(outputs), as_tuple(caches)};
    write_file(argv[3], torch::pickle_save(c10::ivalue::Tuple::create(std::move(result))));
    std::cout << "ran " << steps.size() << " steps of " << argv[1] << "\n";
  } catch (const std::exception& e) {
    std::cerr << "run_aoti: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
