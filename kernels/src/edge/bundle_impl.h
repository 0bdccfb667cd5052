/* bundle_impl.h: what bundle.cpp and bundle_image.cpp share (internal to libnora_edge's bundle reader). */
#ifndef NORA_EDGE_BUNDLE_IMPL_H
#define NORA_EDGE_BUNDLE_IMPL_H

#include <nlohmann/json.hpp>
#include <string>

#include "edge/bundle.h"

namespace nora_edge {
namespace detail {

using json = nlohmann::ordered_json;
constexpr const char *MANIFEST = "manifest.json";

/* throw BundleError(NORA_EDGE_ERR_BUNDLE, msg) */
[[noreturn]] void fail(const std::string &msg);
/* Python's repr of a JSON value, close enough for messages (None/True/False, 'str'), cut to `cut` chars like
 * bundle_specs.require_field's {value!r:.80}. */
std::string repr(const json &v, size_t cut = 80);
/* preprocess.ImageSpec.from_manifest + output_size + c_path_unsupported on the manifest's image section. */
ImageInfo image_spec(const json &d);

}  // namespace detail
}  // namespace nora_edge

#endif /* NORA_EDGE_BUNDLE_IMPL_H */
