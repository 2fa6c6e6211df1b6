"""The custom ops as IPluginV3 plugins (IPluginV3OneCore/OneBuild/OneRuntime + an IPluginCreatorV3One creator), written
against the public TensorRT 10 Python API: this is the form TensorRT-RTX imports (it refuses the Quick/`tensorrt.plugin`
interfaces) and full TensorRT accepts too. One class pair per registry entry, made from the entry by `plugin_classes`,
so names, versions, fields, shape and dtype rules all come from opset.py.

The ONNX parser maps a node to a plugin by op type (= plugin name), `plugin_version` and namespace (attribute
`plugin_namespace` or the node's domain, here `mambadeploy`). Running a plan (enqueue) launches the op's ahead-of-time
compiled Triton kernel (plugins/aot.py) through the CUDA driver; that path needs a GPU TensorRT supports, which no machine
here has (TensorRT-RTX refuses sm_90, full TensorRT is not installable): it is written, not verified.
"""

from __future__ import annotations

from ..opset import DOMAIN, OUTPUT_ALIASES, REGISTRY, OpEntry
from . import aot, trt_fields, trt_rules

NAMESPACE = DOMAIN
PLUGIN_VERSION = lambda entry: str(entry.version)  # noqa: E731  (plugin_version attribute is a string in ONNX)


def plugin_classes(trt, entry: OpEntry, namespace: str = NAMESPACE):
    """(PluginClass, CreatorClass) for one op, bound to the TensorRT module `trt` (tensorrt or tensorrt_rtx_bindings).
    An op whose outputs alias inputs (opset.OUTPUT_ALIASES: DecodeAttention's caches) builds on IPluginV3OneBuildV2
    where the bindings have it, and answers get_aliased_input (TensorRT >= 10.3, preview feature
    ALIASED_PLUGIN_IO_10_03, which the build worker turns on)."""
    aliases = {entry.outputs.index(o): entry.inputs.index(i) for o, i in OUTPUT_ALIASES.get(entry.name, {}).items()}
    build_iface = trt.IPluginV3OneBuildV2 if aliases and hasattr(trt, "IPluginV3OneBuildV2") else trt.IPluginV3OneBuild

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, build_iface, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            build_iface.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = entry.name
            self.plugin_version = PLUGIN_VERSION(entry)
            self.plugin_namespace = namespace
            self.num_outputs = len(entry.outputs)
            self.attrs = entry.check_attributes(attrs or {})
            self.kernel = None  # AOT kernel, resolved on first enqueue for the shapes TensorRT hands over

        # ---- core
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            other = Plugin(dict(self.attrs))
            other.kernel = self.kernel
            return other

        # ---- build
        def get_output_data_types(self, input_types):
            names = trt_rules.output_dtypes(entry, [trt_rules.dtype_name(t) for t in input_types], self.attrs)
            return [trt_rules.trt_dtype(trt, n) for n in names]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            dims = [tuple(d[i] for i in range(len(d))) for d in inputs]
            outs = trt_rules.output_shapes(entry, dims, self.attrs)
            return [trt.DimsExprs([expr_builder.constant(d) if isinstance(d, int) else d for d in out]) for out in outs]

        def supports_format_combination(self, pos, in_out, num_inputs):
            if in_out[pos].desc.format != trt.TensorFormat.LINEAR:
                return False
            try:
                dtypes = [trt_rules.dtype_name(in_out[i].desc.type) for i in range(pos + 1)]
            except Exception:  # a dtype we have no name for (fp8, int4, ...): not ours
                return False
            return trt_rules.accepts(entry, pos, dtypes)

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            if entry.name not in aot.MULTI_LAUNCH:
                return 0
            return aot.multi_launch(entry.name).workspace_bytes([tuple(d.max) for d in inp])

        def get_aliased_input(self, output_index):
            return aliases.get(output_index, -1)

        def get_valid_tactics(self):
            return []

        # ---- runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            self.kernel = None  # shapes changed: the launch geometry is recomputed at the next enqueue

        def attach_to_context(self, resource_context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt_fields.to_trt_fields(trt, entry, self.attrs)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            shapes = [tuple(d.dims) for d in input_desc]
            dtypes = [trt_rules.dtype_name(d.type) for d in input_desc]
            if entry.name in aot.MULTI_LAUNCH:  # several launches and a workspace (plugins/aot_attention.py)
                launches = aot.multi_launch(entry.name)
                if self.kernel is None:
                    self.kernel = launches.compile_launches(shapes, dtypes, self.attrs)
                launches.enqueue(self.kernel, list(inputs), list(outputs), workspace, shapes, dtypes[0], stream)
                return
            if self.kernel is None:
                self.kernel = aot.compile_for(entry.name, shapes, dtypes, self.attrs)
            aot.launch_on_stream(self.kernel, list(inputs), list(outputs), shapes, stream)

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = entry.name
            self.plugin_namespace = namespace
            self.plugin_version = PLUGIN_VERSION(entry)
            self.field_names = trt_fields.field_names(trt, entry)

        def create_plugin(self, name, field_collection, phase):
            fields = [(f.name, f.data) for f in field_collection] if field_collection is not None else []
            return Plugin(trt_fields.unpack(entry, fields))

    Plugin.__name__ = f"{entry.name}Plugin"
    Creator.__name__ = f"{entry.name}PluginCreator"
    return Plugin, Creator


_REGISTERED: dict[tuple[int, str], list] = {}


def register_plugins(trt, namespace: str = NAMESPACE) -> list[str]:
    """Register one creator per registry op with TensorRT's plugin registry (once per process and module); returns
    the registered names as `namespace::name/version`. The creators are kept alive here: TensorRT holds raw pointers."""
    key = (id(trt), namespace)
    if key not in _REGISTERED:
        registry = trt.get_plugin_registry()
        creators = []
        for entry in REGISTRY.values():
            _, creator_cls = plugin_classes(trt, entry, namespace)
            creator = creator_cls()
            if not registry.register_creator(creator, namespace):
                raise RuntimeError(f"TensorRT refused to register plugin creator {namespace}::{entry.name}")
            creators.append(creator)
        _REGISTERED[key] = creators
    return [f"{namespace}::{c.name}/{c.plugin_version}" for c in _REGISTERED[key]]
