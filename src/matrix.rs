//! A plain row-major host matrix: the exchange format between device tensors, faer and files.

use burn::tensor::{Device, Tensor, TensorData};

/// A dense row-major `f32` matrix on the host.
///
/// emloc moves layer weights, Gram matrices and adapter factors through this type when it does
/// host linear algebra (faer) or file I/O, so every such boundary has one well-defined layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// Creates a matrix from row-major data.
    ///
    /// # Panics
    /// If `data.len() != rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Matrix::new: {rows}x{cols} needs {} values",
            rows * cols
        );
        Self { rows, cols, data }
    }

    /// A `rows x cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::new(rows, cols, vec![0.0; rows * cols])
    }

    /// Element `(i, j)`.
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.cols + j]
    }

    /// The shape as `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The transpose.
    pub fn transpose(&self) -> Self {
        let mut out = vec![0.0; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                out[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        Self::new(self.cols, self.rows, out)
    }

    /// Whether every entry is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|v| v.is_finite())
    }

    /// Reads a 2-D tensor back to the host (converting to `f32`).
    pub fn from_tensor(tensor: Tensor<2>) -> Self {
        let [rows, cols] = tensor.dims();
        let data = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("a float tensor converts to f32");
        Self::new(rows, cols, data)
    }

    /// Uploads the matrix as a 2-D `f32` tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(self.data.clone(), [self.rows, self.cols]), device)
    }

    /// Like [`to_tensor`](Self::to_tensor), moving the data instead of copying it (on host
    /// backends no second copy of the matrix is made).
    pub fn into_tensor(self, device: &Device) -> Tensor<2> {
        Tensor::from_data(TensorData::new(self.data, [self.rows, self.cols]), device)
    }
}
