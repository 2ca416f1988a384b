//! The byte layout of every map's keys and values, by field name, and the
//! record of it pinned beside the maps (`LAYOUTS`), so that a daemon of
//! another build can carry a map's entries over to its own layout.
//!
//! A layout is a list of [`Field`]s: name, offset and size in bytes. Two
//! builds agree on a map when their layouts and shapes are equal; when they
//! do not, an entry is converted field by field, by name (see
//! [`convert`]): a field both have is copied, a field only the target has
//! is zero, a field only the source has is dropped. This works both ways,
//! so an older build converts a newer build's entries too (a downgrade),
//! as long as a field that keeps its name keeps its meaning and size: a
//! field whose meaning changes gets a new name. (Cilium migrates a map
//! whose spec changed the same way in spirit: a new map beside the old,
//! filled before the programs switch; its conversion is per map, ours by
//! field name.)
//!
//! The fields of a struct are listed by [`fields!`], which the compiler
//! checks names every field (an exhaustive pattern) and takes offsets and
//! sizes from the struct itself.

/// One field of a key or value: `size` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: u16,
    pub size: u16,
}

/// The size of the field `p` points into (a helper of [`fields!`]).
#[doc(hidden)]
pub const fn size_at<F>(_: *const F) -> u16 {
    core::mem::size_of::<F>() as u16
}

/// `fields!(Struct { a, b, c })`: the [`Field`]s of `Struct`, every field
/// named (a field left out does not compile), offsets and sizes from the
/// struct. `fields!(Struct { a, b } + N)` shifts the offsets by `N` bytes
/// (the data of an LPM trie key, after its 4-byte prefix length).
#[macro_export]
macro_rules! fields {
    ($t:ident { $($f:ident),* $(,)? }) => {
        $crate::fields!($t { $($f),* } + 0)
    };
    ($t:ident { $($f:ident),* $(,)? } + $base:expr) => {{
        #[allow(dead_code)]
        fn every_field_is_named(v: $t) {
            let $t { $($f: _),* } = v;
        }
        const FIELDS: &[$crate::layout::Field] = &[$($crate::layout::Field {
            name: stringify!($f),
            offset: (core::mem::offset_of!($t, $f) + $base) as u16,
            // SAFETY: only the field's address is taken, nothing is read.
            size: $crate::layout::size_at(unsafe {
                core::ptr::addr_of!((*core::mem::MaybeUninit::<$t>::uninit().as_ptr()).$f)
            }),
        }),*];
        FIELDS
    }};
}

/// A key or value that is one plain value (a cookie, an address, a flag
/// byte): a single field `name` of `size` bytes.
pub const fn whole(name: &'static str, size: usize) -> [Field; 1] {
    [Field {
        name,
        offset: 0,
        size: size as u16,
    }]
}

/// Longest field name a [`MapLayout`] record holds, in bytes.
pub const FIELD_NAME_LEN: usize = 26;
/// Most fields (key and value together) a [`MapLayout`] record holds.
pub const MAX_FIELDS: usize = 32;
/// Longest map name a [`MapLayout`] record holds, in bytes (the kernel's
/// `BPF_OBJ_NAME_LEN`).
pub const MAP_NAME_LEN: usize = 16;

/// Capacity of the `LAYOUTS` map: room for every map of two builds at
/// once (the pinned ones and a newer build's beside them, mid-upgrade).
pub const MAX_MAPS: u32 = 64;

/// [`FieldLayout::part`]: the field is in the key.
pub const PART_KEY: u8 = 0;
/// [`FieldLayout::part`]: the field is in the value.
pub const PART_VALUE: u8 = 1;

/// One field in a [`MapLayout`] record: 32 bytes, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    /// UTF-8, NUL-padded.
    pub name: [u8; FIELD_NAME_LEN],
    /// [`PART_KEY`] or [`PART_VALUE`].
    pub part: u8,
    pub _pad: u8,
    pub offset: u16,
    pub size: u16,
}

/// Value of the `LAYOUTS` map (key: the `u32` map id, as the kernel
/// numbers maps): the layout of that map's keys and values as the build
/// that made it declared them. 1,056 bytes, host byte order.
///
/// This record's own layout never changes: it is how every build reads
/// every other's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// The map's name, UTF-8, NUL-padded.
    pub name: [u8; MAP_NAME_LEN],
    pub key_size: u32,
    pub value_size: u32,
    /// How many of `fields` are set.
    pub field_count: u32,
    pub _pad: u32,
    pub fields: [FieldLayout; MAX_FIELDS],
}

/// A map's key and value layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub key_size: u16,
    pub key: &'static [Field],
    pub value_size: u16,
    pub value: &'static [Field],
}

fn copy_name<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let b = s.as_bytes();
    assert!(b.len() <= N, "name {s} is longer than {N} bytes");
    out[..b.len()].copy_from_slice(b);
    out
}

fn name_of(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..end]).unwrap_or("")
}

impl MapLayout {
    /// The record of `layout` for the map `name`. Panics when a name is
    /// too long or there are more than [`MAX_FIELDS`] fields (a build
    /// error: `every_layout_fits_its_record` checks it).
    pub fn new(name: &str, layout: &Layout) -> MapLayout {
        let mut fields = [FieldLayout {
            name: [0; FIELD_NAME_LEN],
            part: 0,
            _pad: 0,
            offset: 0,
            size: 0,
        }; MAX_FIELDS];
        let all = layout
            .key
            .iter()
            .map(|f| (PART_KEY, f))
            .chain(layout.value.iter().map(|f| (PART_VALUE, f)));
        let mut n = 0;
        for (part, f) in all {
            assert!(n < MAX_FIELDS, "{name} has more than {MAX_FIELDS} fields");
            fields[n] = FieldLayout {
                name: copy_name(f.name),
                part,
                _pad: 0,
                offset: f.offset,
                size: f.size,
            };
            n += 1;
        }
        MapLayout {
            name: copy_name(name),
            key_size: layout.key_size.into(),
            value_size: layout.value_size.into(),
            field_count: n as u32,
            _pad: 0,
            fields,
        }
    }

    /// The map's name as recorded.
    pub fn map_name(&self) -> &str {
        name_of(&self.name)
    }

    /// The recorded fields of `part`: (name, offset, size).
    pub fn fields_of(&self, part: u8) -> impl Iterator<Item = (&str, usize, usize)> + '_ {
        self.fields[..(self.field_count as usize).min(MAX_FIELDS)]
            .iter()
            .filter(move |f| f.part == part)
            .map(|f| (name_of(&f.name), f.offset as usize, f.size as usize))
    }
}

/// Convert one key or value (`part`) from the layout `from` to the layout
/// `to`, by field name: `out` (`to`'s size) gets each of `to`'s fields
/// from `from`'s field of the same name and size, and zeros where `from`
/// has none. Returns the names of `to`'s fields that were zero-filled for
/// want of a source. Bytes outside every field (there are none in
/// divert's layouts) stay zero.
pub fn convert<'a>(
    from: &MapLayout,
    to: &'a MapLayout,
    part: u8,
    input: &[u8],
    out: &mut [u8],
    mut missing: impl FnMut(&'a str),
) {
    out.fill(0);
    for (name, offset, size) in to.fields_of(part) {
        let src = from
            .fields_of(part)
            .find(|&(n, _, s)| n == name && s == size)
            .map(|(_, o, _)| o);
        match src {
            Some(o) if o + size <= input.len() && offset + size <= out.len() => {
                out[offset..offset + size].copy_from_slice(&input[o..o + size]);
            }
            _ => missing(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    struct Old {
        a: u32,
        b: u16,
        gone: u16,
    }
    #[repr(C)]
    struct New {
        added: u16,
        b: u16,
        a: u32,
    }

    const OLD: Layout = Layout {
        key_size: 8,
        key: &whole("cookie", 8),
        value_size: 8,
        value: fields!(Old { a, b, gone }),
    };
    const NEW: Layout = Layout {
        key_size: 8,
        key: &whole("cookie", 8),
        value_size: 8,
        value: fields!(New { added, b, a }),
    };

    #[test]
    fn fields_come_from_the_struct() {
        assert_eq!(
            OLD.value,
            &[
                Field {
                    name: "a",
                    offset: 0,
                    size: 4
                },
                Field {
                    name: "b",
                    offset: 4,
                    size: 2
                },
                Field {
                    name: "gone",
                    offset: 6,
                    size: 2
                }
            ]
        );
        #[repr(C, packed)]
        struct P {
            x: u64,
            y: [u8; 4],
        }
        let shifted: &[Field] = fields!(P { x, y } + 4);
        assert_eq!((shifted[1].offset, shifted[1].size), (12, 4));
    }

    #[test]
    fn conversion_is_by_name_both_ways() {
        let (old, new) = (MapLayout::new("M", &OLD), MapLayout::new("M", &NEW));
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&7u32.to_ne_bytes());
        v[4..6].copy_from_slice(&9u16.to_ne_bytes());
        v[6..8].copy_from_slice(&5u16.to_ne_bytes());
        let mut up = [0xffu8; 8];
        let mut zeroed = [""; 2];
        let mut n = 0;
        convert(&old, &new, PART_VALUE, &v, &mut up, |f| {
            zeroed[n] = f;
            n += 1;
        });
        assert_eq!(&zeroed[..n], &["added"]);
        assert_eq!(up[..2], [0, 0]);
        assert_eq!(up[2..4], 9u16.to_ne_bytes());
        assert_eq!(up[4..8], 7u32.to_ne_bytes());
        // And back: `gone` was dropped on the way up, so it comes back zero.
        let mut down = [0xffu8; 8];
        convert(&new, &old, PART_VALUE, &up, &mut down, |_| {});
        assert_eq!(down[..6], v[..6]);
        assert_eq!(down[6..], [0, 0]);
        // The key is its own part.
        let key = 42u64.to_ne_bytes();
        let mut k = [0u8; 8];
        convert(&old, &new, PART_KEY, &key, &mut k, |f| panic!("{f}"));
        assert_eq!(k, key);
    }

    #[test]
    fn a_field_that_changed_size_is_not_copied() {
        #[repr(C)]
        struct Wide {
            a: u64,
        }
        const COOKIE: [Field; 1] = whole("cookie", 8);
        let wide = MapLayout::new(
            "M",
            &Layout {
                key_size: 8,
                key: &COOKIE,
                value_size: 8,
                value: fields!(Wide { a }),
            },
        );
        let old = MapLayout::new("M", &OLD);
        let mut out = [0xffu8; 8];
        let mut missing = None;
        convert(&old, &wide, PART_VALUE, &[1; 8], &mut out, |f| {
            missing = Some(f)
        });
        assert_eq!(missing, Some("a"));
        assert_eq!(out, [0; 8]);
    }

    #[test]
    fn the_record_round_trips_names() {
        let r = MapLayout::new("POLICIES", &NEW);
        assert_eq!(r.map_name(), "POLICIES");
        let v: [(&str, usize, usize); 3] = [("added", 0, 2), ("b", 2, 2), ("a", 4, 4)];
        assert!(r.fields_of(PART_VALUE).eq(v));
        assert_eq!(core::mem::size_of::<MapLayout>(), 1056);
        assert_eq!(core::mem::size_of::<FieldLayout>(), 32);
    }
}
