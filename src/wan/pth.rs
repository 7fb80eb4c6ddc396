//! A restricted reader of PyTorch `.pth` checkpoints (spec §3.1): the zip archives that
//! `torch.save` writes since PyTorch 1.6, holding a pickled `OrderedDict[str, Tensor]`.
//!
//! ```text
//! <top>/data.pkl        the pickle (protocol 2): the dict, with each tensor a call of
//!                       torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)
//! <top>/data/<key>      one raw little-endian storage per key, referenced by persistent ids
//!                       ("storage", torch.<Type>Storage, key, location, numel)
//! <top>/byteorder       "little" (absent in older files)
//! ```
//!
//! The folder name `<top>` varies (usually the file stem, or `archive`).
//!
//! # Safety against code in checkpoints
//!
//! Unpickling with Python runs arbitrary code. This reader has its own small pickle machine that
//! only knows data opcodes (numbers, strings, tuples, lists, dicts, the memo, `MARK`, `FRAME`,
//! `STOP`), `BINPERSID` for storages and `GLOBAL` / `STACK_GLOBAL` + `REDUCE` / `BUILD` for
//! exactly these names: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_tensor`, `torch._utils._rebuild_parameter` and the storage types
//! `torch.{Float,BFloat16,Half,Double,Long,Int,Short,Char,Byte,Bool}Storage`. None of them is
//! run: each is interpreted by this module. Any other global (`os.system`, `builtins.eval`, …)
//! and any other opcode (`INST`, `OBJ`, `NEWOBJ`, `EXT1`, the text-protocol opcodes, …) is an
//! [`Error`] that names it. Loading a checkpoint never runs code.
//!
//! # Memory
//!
//! The file is memory-mapped. Opening it reads the zip directory and `data.pkl` (a few hundred
//! bytes per tensor); the tensor data is only touched when [`PthFile::raw`] / [`PthFile::f32`]
//! read it, so [`PthFile::raw`] is zero-copy and opening the 11 GB umT5 checkpoint is instant.
//! PyTorch stores every entry uncompressed; a compressed entry (a re-zipped file) is an error.
//!
//! Only contiguous tensors are supported (state dicts of modules always are); a view with other
//! strides is an error that says so. [`convert_to_safetensors`] writes the same tensors to a
//! `.safetensors` file, so a checkpoint can be converted once and then read with
//! [`crate::io::TensorFile`] or the crate's other loaders.

use crate::error::{Error, Result};
use crate::io::RawTensor;
use memmap2::Mmap;
use safetensors::Dtype;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A PyTorch `.pth` checkpoint (zip format) whose `data.pkl` held a flat dict of tensors,
/// memory-mapped; tensors are read lazily.
pub struct PthFile {
    path: PathBuf,
    map: Mmap,
    tensors: Vec<Entry>,
    index: HashMap<String, usize>,
}

/// One tensor: where its bytes lie in the mapped file.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Range<usize>,
}

impl std::fmt::Debug for PthFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PthFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl PthFile {
    /// Opens a `.pth` checkpoint: reads the zip directory, runs the restricted pickle reader on
    /// `<top>/data.pkl` and checks every tensor against its storage. Errors name the file and
    /// what is wrong (not a zip / truncated, legacy format, forbidden opcode or global,
    /// non-contiguous tensor, missing storage, …).
    pub fn open(path: impl AsRef<Path>) -> Result<PthFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::file(&path, e))?;
        let len = file.metadata().map_err(|e| Error::file(&path, e))?.len();
        if len == 0 {
            return Err(Error::file(
                &path,
                "is empty; expected a PyTorch checkpoint written by torch.save (a zip archive)",
            ));
        }
        // SAFETY: a read-only mapping; a file changed underneath a running process is outside
        // what any mmap-based loader can defend against.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(&path, e))?;
        let (tensors, index) = parse(&path, &map)?;
        Ok(PthFile {
            path,
            map,
            tensors,
            index,
        })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order the checkpoint stores them.
    pub fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Raw access to one tensor (dtype, shape, little-endian bytes borrowed from the mapping;
    /// nothing is copied).
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self.index.get(name).ok_or_else(|| {
            Error::file(
                &self.path,
                format!(
                    "has no tensor named {name:?} ({} tensors; the first are {})",
                    self.tensors.len(),
                    first_names(self.tensors.iter().map(|t| t.name.as_str()))
                ),
            )
        })?;
        let t = &self.tensors[i];
        Ok(RawTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: &self.map[t.bytes.clone()],
        })
    }

    /// A float tensor as f32 (F32, F16, BF16 and F64 are converted) with its shape.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let r = self.raw(name)?;
        let v = match crate::io::float_to_f32(r.dtype, r.data) {
            Some(v) => v,
            None => {
                let d = r.dtype;
                return Err(Error::file(
                    &self.path,
                    format!("tensor {name:?} has dtype {d:?}; expected F32, F16, BF16 or F64"),
                ));
            }
        };
        Ok((v, r.shape))
    }

    /// Writes every tensor (same names, dtypes, shapes and bytes) to a `.safetensors` file with
    /// the metadata `format = pt` and `converted_from = <this file's name>`. The data streams
    /// from the mapping to the file; the file appears under its name only once complete.
    /// Returns the number of tensors written.
    pub fn write_safetensors(&self, out: impl AsRef<Path>) -> Result<usize> {
        let out = out.as_ref();
        let same = match (self.path.canonicalize(), out.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::file(
                out,
                "is the checkpoint being converted; choose another output path (e.g. with the \
                 .safetensors extension)",
            ));
        }
        let views = self
            .tensors
            .iter()
            .map(|t| {
                safetensors::tensor::TensorView::new(
                    t.dtype,
                    t.shape.clone(),
                    &self.map[t.bytes.clone()],
                )
                .map(|v| (t.name.clone(), v))
                .map_err(|e| Error::file(&self.path, format!("tensor {:?}: {e}", t.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        if let Some(n) = self.path.file_name() {
            meta.insert(
                "converted_from".to_string(),
                n.to_string_lossy().into_owned(),
            );
        }
        let mut partial = out.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        safetensors::serialize_to_file(views, Some(meta), &partial).map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            Error::file(out, format!("could not write the safetensors file: {e}"))
        })?;
        std::fs::rename(&partial, out).map_err(|e| Error::file(out, e))?;
        Ok(self.tensors.len())
    }
}

/// Converts a `.pth` checkpoint to a `.safetensors` file once, so that later runs can map it
/// directly: same tensor names, dtypes, shapes and bytes. Returns the number of tensors.
pub fn convert_to_safetensors(pth: impl AsRef<Path>, out: impl AsRef<Path>) -> Result<usize> {
    PthFile::open(pth)?.write_safetensors(out)
}

fn first_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = names.take(5).map(|n| format!("{n:?}")).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// zip layer

type Parsed = (Vec<Entry>, HashMap<String, usize>);

fn parse(path: &Path, map: &[u8]) -> Result<Parsed> {
    let mut zip = match zip::ZipArchive::new(Cursor::new(map)) {
        Ok(z) => z,
        Err(e) => {
            let reason = if map.starts_with(&[0x80]) {
                "is a legacy (pre-1.6, non-zip) torch.save file, which this reader does not \
                 support; re-save it with a current PyTorch (torch.save(torch.load(f), f2)) to get \
                 the zip format"
                    .to_string()
            } else if map.starts_with(b"PK") {
                format!(
                    "is a truncated or corrupt zip archive ({e}); a PyTorch checkpoint is a \
                     complete zip file written by torch.save, so re-download or re-save it"
                )
            } else {
                format!(
                    "is not a PyTorch checkpoint: expected a zip archive written by torch.save \
                     (PyTorch ≥ 1.6), but the file does not start like one ({e})"
                )
            };
            return Err(Error::file(path, reason));
        }
    };
    // the pickle: exactly one `<top>/data.pkl`
    let pkls: Vec<String> = zip
        .file_names()
        .filter(|n| {
            n.strip_suffix("/data.pkl")
                .is_some_and(|top| !top.is_empty() && !top.contains('/'))
        })
        .map(str::to_string)
        .collect();
    let pkl_name = match pkls.as_slice() {
        [one] => one.clone(),
        [] => {
            let names: Vec<&str> = zip.file_names().take(8).collect();
            return Err(Error::file(
                path,
                format!(
                    "is a zip archive but not a PyTorch checkpoint: it has no `<folder>/data.pkl` \
                     entry (its first entries are {names:?})"
                ),
            ));
        }
        many => {
            return Err(Error::file(
                path,
                format!(
                    "holds several pickles {many:?}; a PyTorch checkpoint has exactly one \
                     `<folder>/data.pkl`"
                ),
            ));
        }
    };
    let top = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Some(i) = zip.index_for_name(&format!("{top}byteorder")) {
        let r = stored_range(path, &mut zip, i, map.len())?;
        let order = String::from_utf8_lossy(&map[r]).trim().to_string();
        if order != "little" {
            return Err(Error::file(
                path,
                format!(
                    "stores its tensors in {order:?} byte order; only little-endian checkpoints \
                     are supported (re-save it on a little-endian machine)"
                ),
            ));
        }
    }
    let i = zip.index_for_name(&pkl_name).unwrap_or(0);
    let pkl_range = stored_range(path, &mut zip, i, map.len())?;
    let root = Machine::new(&map[pkl_range])
        .run()
        .map_err(|e| Error::file(path, format!("{pkl_name}: {e}")))?;

    // the dict → tensors
    let Value::Dict(items) = &root else {
        return Err(Error::file(
            path,
            format!(
                "{pkl_name}: the pickled object is {}, not a dict of tensors; this reader expects \
                 a state dict saved with torch.save(module.state_dict(), path)",
                root.kind()
            ),
        ));
    };
    let items = items.borrow();
    let mut storages: HashMap<String, Range<usize>> = HashMap::new();
    let mut tensors: Vec<Entry> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (k, v) in items.iter() {
        let Value::Str(name) = k else {
            return Err(Error::file(
                path,
                format!(
                    "{pkl_name}: a key of the state dict is {}, not a string",
                    k.kind()
                ),
            ));
        };
        let Value::Tensor(t) = v else {
            return Err(Error::file(
                path,
                format!(
                    "{pkl_name}: the value of {name:?} is {}, not a tensor; this reader expects a \
                     flat state dict (torch.save(module.state_dict(), path)), not a wrapper such \
                     as {{\"state_dict\": …}}",
                    v.kind()
                ),
            ));
        };
        let entry = tensor_entry(path, &mut zip, map.len(), &top, &mut storages, name, t)?;
        // a repeated key keeps its first position and its last value, as a Python dict does
        if let Some(&j) = index.get(&**name) {
            tensors[j] = entry;
        } else {
            index.insert(name.to_string(), tensors.len());
            tensors.push(entry);
        }
    }
    Ok((tensors, index))
}

/// The byte range of a stored (uncompressed, unencrypted) zip entry inside the mapping.
fn stored_range(
    path: &Path,
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    i: usize,
    file_len: usize,
) -> Result<Range<usize>> {
    let f = zip.by_index_raw(i).map_err(|e| {
        Error::file(
            path,
            format!("zip entry #{i} cannot be read ({e}); the file is truncated or corrupt"),
        )
    })?;
    let name = f.name().to_string();
    if f.encrypted() {
        return Err(Error::file(
            path,
            format!("zip entry {name:?} is encrypted; PyTorch checkpoints are not"),
        ));
    }
    if f.compression() != zip::CompressionMethod::Stored {
        return Err(Error::file(
            path,
            format!(
                "zip entry {name:?} is compressed ({}); torch.save stores entries uncompressed, \
                 which this reader needs to map them: re-save the checkpoint with torch.save \
                 instead of re-zipping it",
                f.compression()
            ),
        ));
    }
    let start = f.data_start().unwrap_or(u64::MAX);
    let end = start.saturating_add(f.size());
    if end > file_len as u64 || f.compressed_size() != f.size() {
        return Err(Error::file(
            path,
            format!(
                "zip entry {name:?} extends past the end of the file or is damaged (truncated \
                 download?); re-download or re-save the checkpoint"
            ),
        ));
    }
    Ok(start as usize..end as usize)
}

fn tensor_entry(
    path: &Path,
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    file_len: usize,
    top: &str,
    storages: &mut HashMap<String, Range<usize>>,
    name: &str,
    t: &TensorRef,
) -> Result<Entry> {
    let bad = |reason: String| Error::file(path, format!("tensor {name:?}: {reason}"));
    let st = &t.storage;
    let es = st.dtype.bitsize() / 8;
    let entry_name = format!("{top}data/{}", st.key);
    let range = match storages.get(&st.key) {
        Some(r) => r.clone(),
        None => {
            let i = zip.index_for_name(&entry_name).ok_or_else(|| {
                bad(format!(
                    "its storage {entry_name:?} is missing from the archive (truncated or \
                     incomplete checkpoint)"
                ))
            })?;
            let r = stored_range(path, zip, i, file_len)?;
            storages.insert(st.key.clone(), r.clone());
            r
        }
    };
    let storage_bytes = st.numel.checked_mul(es);
    if storage_bytes.is_none_or(|b| b > range.len()) {
        return Err(bad(format!(
            "its storage {entry_name:?} should hold {} elements of {:?} but has {} bytes \
             (truncated or corrupt checkpoint)",
            st.numel,
            st.dtype,
            range.len()
        )));
    }
    if t.shape.len() != t.stride.len() {
        return Err(bad(format!(
            "shape {:?} and strides {:?} have different lengths",
            t.shape, t.stride
        )));
    }
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
    if numel > 0 {
        let mut expect = 1usize;
        for (d, (&n, &s)) in t.shape.iter().zip(&t.stride).enumerate().rev() {
            if n != 1 && s != expect {
                let contiguous = contiguous_strides(&t.shape);
                return Err(bad(format!(
                    "not contiguous: shape {:?} with strides {:?} (dimension {d}), but this \
                     reader only maps contiguous tensors, whose strides would be {contiguous:?}; \
                     save `{{k: v.contiguous() for k, v in state_dict.items()}}` instead",
                    t.shape, t.stride
                )));
            }
            expect = expect.saturating_mul(n);
        }
    }
    let end = t.offset.checked_add(numel);
    if end.is_none_or(|e| e > st.numel) {
        return Err(bad(format!(
            "storage offset {} + {numel} elements exceeds its storage {entry_name:?} of {} \
             elements (corrupt checkpoint)",
            t.offset, st.numel
        )));
    }
    let start = range.start + t.offset * es;
    Ok(Entry {
        name: name.to_string(),
        dtype: st.dtype,
        shape: t.shape.clone(),
        bytes: start..start + numel * es,
    })
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1].saturating_mul(shape[d + 1]);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// the restricted pickle machine

/// The callables and types a checkpoint may name; interpreted here, never run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    Storage(Dtype),
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", s) => Global::Storage(match s {
                "FloatStorage" => Dtype::F32,
                "BFloat16Storage" => Dtype::BF16,
                "HalfStorage" => Dtype::F16,
                "DoubleStorage" => Dtype::F64,
                "LongStorage" => Dtype::I64,
                "IntStorage" => Dtype::I32,
                "ShortStorage" => Dtype::I16,
                "CharStorage" => Dtype::I8,
                "ByteStorage" => Dtype::U8,
                "BoolStorage" => Dtype::BOOL,
                _ => return None,
            }),
            _ => return None,
        })
    }

    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::RebuildTensor => "torch._utils._rebuild_tensor".into(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".into(),
            Global::Storage(d) => format!("the {d:?} storage type"),
        }
    }
}

struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: usize,
}

struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// A pickle value. Containers are shared (`Rc`), as Python objects are, so the memo is cheap
/// and a mutated container is seen through every reference.
#[derive(Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float (its value is never needed).
    Float,
    Str(Rc<str>),
    /// A bytes object (its content is never needed).
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

/// Dropping without recursion: a hostile pickle can nest containers a million deep, and the
/// derived drop would recurse once per level and overflow the stack. Children of containers
/// that this value owns alone are moved to a work list instead.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_children(&mut work);
        while let Some(mut v) = work.pop() {
            v.take_children(&mut work);
        }
    }
}

impl Value {
    fn take_children(&mut self, work: &mut Vec<Value>) {
        match self {
            Value::Tuple(t) => {
                if let Some(v) = Rc::get_mut(t) {
                    work.append(v);
                }
            }
            Value::List(l) => {
                if let Some(v) = Rc::get_mut(l) {
                    work.append(v.get_mut());
                }
            }
            Value::Dict(d) => {
                if let Some(v) = Rc::get_mut(d) {
                    for (k, x) in v.get_mut().drain(..) {
                        work.push(k);
                        work.push(x);
                    }
                }
            }
            _ => {}
        }
    }

    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float => "a float".into(),
            Value::Str(_) => "a string".into(),
            Value::Bytes => "a bytes object".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => g.name(),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
        }
    }
}

/// The name of a pickle opcode (every protocol), for error messages.
fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

const ALLOWED_GLOBALS: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, \
     torch._utils._rebuild_tensor, torch._utils._rebuild_parameter and \
     torch.{Float,BFloat16,Half,Double,Long,Int,Short,Char,Byte,Bool}Storage";

type VmResult<T> = std::result::Result<T, String>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Position of the opcode being executed, for messages.
    at: usize,
    op: &'static str,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Machine<'a> {
        Machine {
            data,
            pos: 0,
            at: 0,
            op: "",
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> VmResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!(
                "the pickle ends inside opcode {} at byte {} (it needs {n} more bytes, {} are \
                 left): the file is truncated or corrupt",
                self.op,
                self.at,
                self.data.len() - self.pos
            ));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> VmResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> VmResult<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }

    fn u64(&mut self) -> VmResult<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }

    fn len64(&mut self) -> VmResult<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .map_err(|_| format!("opcode {} at byte {}: length {n}", self.op, self.at))
    }

    fn line(&mut self) -> VmResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(1024)
            .position(|&b| b == b'\n')
            .ok_or_else(|| {
                format!(
                    "opcode {} at byte {}: no end of line within 1024 bytes (truncated or corrupt)",
                    self.op, self.at
                )
            })?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| format!("opcode {} at byte {}: not UTF-8 text", self.op, self.at))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> VmResult<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| {
            format!(
                "opcode {} at byte {}: the string is not valid UTF-8",
                self.op, self.at
            )
        })?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn pop(&mut self) -> VmResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(format!(
                "opcode {} at byte {} pops past a MARK (corrupt pickle)",
                self.op, self.at
            ));
        }
        self.stack
            .pop()
            .ok_or_else(|| format!("opcode {} at byte {} on an empty stack", self.op, self.at))
    }

    fn top(&mut self) -> VmResult<&mut Value> {
        let (op, at) = (self.op, self.at);
        self.stack
            .last_mut()
            .ok_or_else(|| format!("opcode {op} at byte {at} on an empty stack"))
    }

    fn pop_mark(&mut self) -> VmResult<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| {
            format!(
                "opcode {} at byte {} without a MARK (corrupt pickle)",
                self.op, self.at
            )
        })?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn int(&self, v: &Value, what: &str) -> VmResult<usize> {
        match v {
            Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| format!("{what} {i}")),
            Value::Bool(b) => Ok(usize::from(*b)),
            other => Err(format!(
                "opcode {} at byte {}: {what} is {}, expected a non-negative int",
                self.op,
                self.at,
                other.kind()
            )),
        }
    }

    fn ints(&self, v: &Value, what: &str) -> VmResult<Vec<usize>> {
        match v {
            Value::Tuple(t) => t.iter().map(|x| self.int(x, what)).collect(),
            Value::List(l) => l.borrow().iter().map(|x| self.int(x, what)).collect(),
            other => Err(format!(
                "opcode {} at byte {}: {what} is {}, expected a tuple of ints",
                self.op,
                self.at,
                other.kind()
            )),
        }
    }

    fn global(&self, module: &str, name: &str) -> VmResult<Value> {
        Global::lookup(module, name)
            .map(Value::Global)
            .ok_or_else(|| {
                format!(
                    "opcode {} at byte {} refers to the global `{module}.{name}`, which is not \
                 allowed: a checkpoint may only name {ALLOWED_GLOBALS}. This reader never runs \
                 code from a checkpoint; a file that needs `{module}.{name}` is not a plain state \
                 dict (or is malicious)",
                    self.op, self.at
                )
            })
    }

    fn set_items(&self, target: &Value, items: Vec<Value>) -> VmResult<()> {
        let Value::Dict(d) = target else {
            return Err(format!(
                "opcode {} at byte {} sets items on {}, which is not a dict",
                self.op,
                self.at,
                target.kind()
            ));
        };
        if !items.len().is_multiple_of(2) {
            return Err(format!(
                "opcode {} at byte {}: an odd number of keys and values",
                self.op, self.at
            ));
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn append(&self, target: &Value, items: Vec<Value>) -> VmResult<()> {
        let Value::List(l) = target else {
            return Err(format!(
                "opcode {} at byte {} appends to {}, which is not a list",
                self.op,
                self.at,
                target.kind()
            ));
        };
        l.borrow_mut().extend(items);
        Ok(())
    }

    fn reduce(&self, callable: Value, args: Value) -> VmResult<Value> {
        let Value::Tuple(args) = &args else {
            return Err(format!(
                "REDUCE at byte {}: the arguments are {}, not a tuple",
                self.at,
                args.kind()
            ));
        };
        let g = match callable {
            Value::Global(g) => g,
            other => {
                return Err(format!(
                    "REDUCE at byte {} calls {}, which is not callable here",
                    self.at,
                    other.kind()
                ));
            }
        };
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(format!(
                        "REDUCE at byte {}: collections.OrderedDict is called with {} arguments; \
                         only OrderedDict() (filled by SETITEMS) is supported",
                        self.at,
                        args.len()
                    ));
                }
                Ok(Value::Dict(Rc::new(RefCell::new(Vec::new()))))
            }
            Global::RebuildTensorV2 | Global::RebuildTensor => {
                let need = if g == Global::RebuildTensor { 4 } else { 6 };
                if args.len() < need || args.len() > need + 1 {
                    return Err(format!(
                        "REDUCE at byte {}: {} takes {need} arguments (storage, storage_offset, \
                         size, stride{}), got {}",
                        self.at,
                        g.name(),
                        if need == 6 {
                            ", requires_grad, backward_hooks"
                        } else {
                            ""
                        },
                        args.len()
                    ));
                }
                let Value::Storage(storage) = &args[0] else {
                    return Err(format!(
                        "REDUCE at byte {}: {}'s first argument is {}, not a storage",
                        self.at,
                        g.name(),
                        args[0].kind()
                    ));
                };
                Ok(Value::Tensor(Rc::new(TensorRef {
                    storage: storage.clone(),
                    offset: self.int(&args[1], "the storage offset")?,
                    shape: self.ints(&args[2], "the size")?,
                    stride: self.ints(&args[3], "the stride")?,
                })))
            }
            Global::RebuildParameter => match args.first() {
                Some(t @ Value::Tensor(_)) if (3..=4).contains(&args.len()) => Ok(t.clone()),
                _ => Err(format!(
                    "REDUCE at byte {}: torch._utils._rebuild_parameter takes (tensor, \
                     requires_grad, backward_hooks)",
                    self.at
                )),
            },
            Global::Storage(d) => Err(format!(
                "REDUCE at byte {} calls {}; storages may only come from persistent ids \
                 (BINPERSID)",
                self.at,
                Global::Storage(d).name()
            )),
        }
    }

    fn persistent(&self, pid: Value) -> VmResult<Value> {
        let bad = || {
            format!(
                "BINPERSID at byte {}: expected a persistent id (\"storage\", torch.<Type>Storage, \
                 key, location, numel)",
                self.at
            )
        };
        let Value::Tuple(t) = &pid else {
            return Err(bad());
        };
        if t.len() != 5 || !matches!(&t[0], Value::Str(s) if &**s == "storage") {
            return Err(bad());
        }
        let Value::Global(Global::Storage(dtype)) = t[1] else {
            return Err(format!(
                "BINPERSID at byte {}: the storage type is {}, expected one of \
                 torch.{{Float,BFloat16,Half,Double,Long,Int,Short,Char,Byte,Bool}}Storage",
                self.at,
                t[1].kind()
            ));
        };
        let key = match &t[2] {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            _ => return Err(bad()),
        };
        if key.is_empty() || key.contains('/') || key.contains("..") {
            return Err(format!(
                "BINPERSID at byte {}: bad storage key {key:?}",
                self.at
            ));
        }
        let numel = self.int(&t[4], "the storage size")?;
        Ok(Value::Storage(Rc::new(StorageRef { dtype, key, numel })))
    }

    fn run(mut self) -> VmResult<Value> {
        loop {
            self.at = self.pos;
            self.op = "";
            if self.pos >= self.data.len() {
                return Err(format!(
                    "the pickle ends at byte {} without a STOP opcode: the file is truncated or \
                     corrupt",
                    self.pos
                ));
            }
            let op = self.u8()?;
            self.op = opcode_name(op).unwrap_or("?");
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!(
                            "pickle protocol {p} is newer than 5, the newest this reader knows"
                        ));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'}' => self
                    .stack
                    .push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b']' => self
                    .stack
                    .push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                    self.set_items(&d, items)?;
                    self.stack.push(d);
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap_or([0; 4]));
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap_or([0; 2]));
                    self.stack.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    let n = usize::from(self.u8()?);
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!(
                            "LONG1 at byte {}: a {n}-byte integer does not fit in 64 bits",
                            self.at
                        ));
                    }
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= i64::from(x) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.len64()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'C' => {
                    let n = usize::from(self.u8()?);
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?;
                }
                b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'q' => u32::from(self.u8()?),
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'h' | b'j' => {
                    let idx = if op == b'h' {
                        u32::from(self.u8()?)
                    } else {
                        self.u32()?
                    };
                    let v = self.memo.get(&idx).cloned().ok_or_else(|| {
                        format!(
                            "{} at byte {} reads memo entry {idx}, which was never stored \
                             (corrupt pickle)",
                            self.op, self.at
                        )
                    })?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (&module, &name) else {
                        return Err(format!(
                            "STACK_GLOBAL at byte {}: module and name must be strings",
                            self.at
                        ));
                    };
                    let g = self.global(m, n)?;
                    self.stack.push(g);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // an OrderedDict's attributes (`_metadata` of a state dict): ignored
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            let kind = other.kind();
                            return Err(format!(
                                "BUILD at byte {} sets the state of {kind}; only dicts (a state \
                                 dict's `_metadata`) may receive a state",
                                self.at
                            ));
                        }
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid)?;
                    self.stack.push(v);
                }
                _ => {
                    let what = match opcode_name(op) {
                        Some(n) => format!("opcode {n} (0x{op:02x})"),
                        None => format!("unknown opcode 0x{op:02x}"),
                    };
                    return Err(format!(
                        "{what} at byte {} is not allowed: this restricted reader only rebuilds \
                         the tensors of a state dict and never creates other objects or runs \
                         code (allowed: the data, container, memo, MARK/FRAME/STOP, \
                         GLOBAL/STACK_GLOBAL of {ALLOWED_GLOBALS}, REDUCE, BUILD and BINPERSID \
                         opcodes)",
                        self.at
                    ));
                }
            }
        }
    }
}
