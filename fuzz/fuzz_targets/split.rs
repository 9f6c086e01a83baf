/// Splits one fuzz input into a JSON text and a binary file: the first two bytes (little
/// endian) give the length of the text, the rest after the text is the binary file. Invalid
/// UTF-8 in the text part is replaced, so every input reaches the parsers.
pub fn split(data: &[u8]) -> (String, &[u8]) {
    if data.len() < 2 {
        return (String::new(), data);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let text = String::from_utf8_lossy(&data[2..2 + n]).into_owned();
    (text, &data[2 + n..])
}
