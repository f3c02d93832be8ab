//! Query strings as the mocks that stand in for the apiserver read them.

/// `%XX` and `+` decoded, as a query string carries a selector.
pub fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    let mut pieces = spaced.split('%');
    let mut out = pieces.next().unwrap_or_default().as_bytes().to_vec();
    for piece in pieces {
        let (hex, rest) = piece.split_at(2);
        out.push(u8::from_str_radix(hex, 16).unwrap());
        out.extend_from_slice(rest.as_bytes());
    }
    String::from_utf8(out).unwrap()
}
